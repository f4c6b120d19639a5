import Foundation
import LaminaJSON
import QMP
import TestSupport
import Testing

/// The daemon driven as operators drive qemu-storage-daemon: Python's
/// qemu.qmp on the monitor, several monitors at once, exports removed
/// while a client is connected. Every scenario runs against both daemons
/// and the answers must agree.
@Suite("Daemon driven live, compared with qemu-storage-daemon", .serialized)
struct DaemonLiveTests {
    /// qemu.qmp (QEMU's own QMP library) runs a small operator session.
    /// It prints one JSON object of the answers that must not depend on
    /// the implementation.
    static let pythonSession = #"""
    import asyncio, json, sys
    from qemu.qmp import QMPClient, ExecuteError

    async def main(path, d):
        out = {}
        qmp = QMPClient('operator')
        await qmp.connect(path)
        v = await qmp.execute('query-version')
        out['version'] = [v['qemu']['major'], v['qemu']['minor']]
        names = [c['name'] for c in await qmp.execute('query-commands')]
        out['has_commands'] = all(n in names for n in ['blockdev-add', 'block-export-add', 'nbd-server-start', 'quit'])
        async def err(cmd, args=None):
            try:
                await qmp.execute(cmd, args)
                return None
            except ExecuteError as e:
                return [e.error_class, e.error.error.desc]
        out['unknown'] = await err('no-such-command')
        out['bad_driver'] = await err('blockdev-add', {'driver': 'nope', 'node-name': 'x'})
        out['missing_file'] = await err('blockdev-add', {'driver': 'file', 'node-name': 'x', 'filename': d + '/missing'})
        await qmp.execute('blockdev-add', {'driver': 'qcow2', 'node-name': 'disk',
                                           'file': {'driver': 'file', 'filename': d + '/disk.qcow2'}})
        nodes = await qmp.execute('query-named-block-nodes', {'flat': True})
        out['nodes'] = sorted([n['node-name'], n['drv'], n['ro']] for n in nodes if not n['node-name'].startswith('#'))
        await qmp.execute('nbd-server-start', {'addr': {'type': 'unix', 'data': {'path': d + '/nbd.sock'}}})
        await qmp.execute('block-export-add', {'type': 'nbd', 'id': 'e0', 'node-name': 'disk', 'name': 'disk', 'writable': True})
        out['exports'] = [[e['id'], e['type'], e['node-name'], e['shutting-down']] for e in await qmp.execute('query-block-exports')]
        out['del_in_use'] = await err('blockdev-del', {'node-name': 'disk'})
        with qmp.listener('BLOCK_EXPORT_DELETED') as listener:
            await qmp.execute('block-export-del', {'id': 'e0'})
            ev = await asyncio.wait_for(listener.get(), 20)
            out['deleted_event'] = ev['data']
        await qmp.execute('nbd-server-stop')
        await qmp.execute('blockdev-del', {'node-name': 'disk'})
        out['after_del'] = await qmp.execute('query-named-block-nodes')
        await qmp.execute('quit')
        try:
            await qmp.disconnect()
        except EOFError:
            pass  # the daemon may close first: that is what quit does
        print(json.dumps(out, sort_keys=True))

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """#

    @Test("Python qemu.qmp drives both daemons through the same session with the same answers")
    func pythonOperatorSession() throws {
        var outputs: [Impl: String] = [:]
        for impl in Impl.allCases {
            let dir = TempDir()
            #expect(try qemuImg(["create", "-q", "-f", "qcow2", dir.file("disk.qcow2"), "64M"]).status == 0)
            try Self.pythonSession.write(toFile: dir.file("session.py"), atomically: true, encoding: .utf8)
            let d = try DaemonProcess(impl, dir: dir.path)
            let r = try run(["python3", dir.file("session.py"), d.qmpPath, dir.path], timeout: 60)
            #expect(r.status == 0, "\(impl): \(r)\n\(d.stderrText())")
            #expect(d.wait() == 0, "\(impl) must exit 0 after quit: \(d.stderrText())")
            outputs[impl] = r.stdout.replacingOccurrences(of: dir.path, with: "DIR")
            let check = try qemuImg(["check", dir.file("disk.qcow2")])
            #expect(check.status == 0, "\(impl): \(check)")
        }
        #expect(outputs[.lamina] == outputs[.qemu])
        let out = try JSON.parse(outputs[.lamina] ?? "")
        #expect(out["version"] == [7, 2])
        #expect(out["has_commands"] == true)
        #expect(out["unknown"]?[0] == "CommandNotFound")
        #expect(out["deleted_event"] == ["id": "e0"])
        #expect(out["after_del"] == [])
    }

    /// A minimal NBD client that completes the handshake for `export`,
    /// says "ready", then waits: prints "eof" when the server closes.
    static let holdingClient = #"""
    import socket, struct, sys
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    def recv(n):
        b = b''
        while len(b) < n:
            c = s.recv(n - len(b))
            if not c: return None
            b += c
        return b
    g = recv(18)
    assert g[:16] == b'NBDMAGICIHAVEOPT', g
    s.sendall(struct.pack('>I', 1))
    name = sys.argv[2].encode()
    s.sendall(b'IHAVEOPT' + struct.pack('>II', 1, len(name)) + name)
    info = recv(8 + 2 + 124)
    assert info is not None, 'export refused'
    print('ready', flush=True)
    open(sys.argv[3], 'w').write('ready')
    s.settimeout(60)
    try:
        d = s.recv(1)
        print('eof' if not d else 'data')
    except socket.timeout:
        print('timeout')
    """#

    @Test("block-export-del: safe refuses while a client is connected, hard disconnects it; events reach every monitor")
    func exportDelSafeAndHard() throws {
        var transcripts: [Impl: [String]] = [:]
        for impl in Impl.allCases {
            let dir = TempDir()
            #expect(try qemuImg(["create", "-q", "-f", "qcow2", dir.file("disk.qcow2"), "16M"]).status == 0)
            try Self.holdingClient.write(toFile: dir.file("client.py"), atomically: true, encoding: .utf8)
            let second = dir.file("qmp2.sock")
            let d = try DaemonProcess(impl, dir: dir.path, args: [
                "--chardev", "socket,id=m1,path=\(second),server=on,wait=off", "--monitor", "chardev=m1",
                "--blockdev", "driver=qcow2,node-name=disk,file.driver=file,file.filename=\(dir.path)/disk.qcow2",
                "--nbd-server", "addr.type=unix,addr.path=\(dir.path)/nbd.sock",
                "--export", "type=nbd,id=e0,node-name=disk,name=disk,writable=on",
            ])
            let a = try d.qmp()
            let b = try QMPClient(unixPath: second, timeout: 30)
            try b.negotiate()
            var t: [String] = []
            func record(_ label: String, _ r: JSON) { t.append("\(label): \(stripVolatile(r).compact)") }

            // A client holds the export open.
            let client = try ChildProcess(["python3", dir.file("client.py"), dir.file("nbd.sock"), "disk", dir.file("ready")],
                                          stderrPath: dir.file("client.err"))
            var ready = false
            for _ in 0..<2000 where !ready {
                ready = FileManager.default.fileExists(atPath: dir.file("ready"))
                if !ready { usleep(10_000) }
            }
            #expect(ready, "\(impl): the NBD client did not connect")
            record("safe", try a.execute("block-export-del", ["id": "e0"]))
            record("exports", try a.execute("query-block-exports"))
            // QEMU 7.2 treats mode=safe like this too: the export stays.
            record("hard", try a.execute("block-export-del", ["id": "e0", "mode": "hard"]))
            let ea = try a.waitEvent("BLOCK_EXPORT_DELETED")
            let eb = try b.waitEvent("BLOCK_EXPORT_DELETED")
            t.append("event a: \(ea["data"]?.compact ?? "")")
            t.append("event b: \(eb["data"]?.compact ?? "")")
            #expect(client.wait(timeout: 30) == 0, "\(impl): client")
            record("exports after", try a.execute("query-block-exports"))
            record("again", try a.execute("block-export-del", ["id": "e0"]))
            // The node is free again.
            record("blockdev-del", try b.execute("blockdev-del", ["node-name": "disk"]))
            #expect(try d.quit(a) == 0, "\(impl): \(d.stderrText())")
            let check = try qemuImg(["check", dir.file("disk.qcow2")])
            #expect(check.status == 0, "\(impl): \(check)")
            transcripts[impl] = t
        }
        let q = transcripts[.qemu] ?? [], l = transcripts[.lamina] ?? []
        #expect(q.count == l.count)
        for (x, y) in zip(q, l) { #expect(x == y) }
        #expect(q.contains { $0.hasPrefix("safe: {\"error\"") }, "\(q)")
    }

    @Test("a QMP monitor on TCP (--chardev socket,host=,port=): qemu.qmp connects to both daemons")
    func tcpMonitor() throws {
        for impl in Impl.allCases {
            let dir = TempDir()
            // A free loopback port (released just before the daemon binds it).
            let portProbe = try run(["python3", "-c",
                "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"])
            let port = portProbe.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            let d = try DaemonProcess(impl, dir: dir.path, args: [
                "--chardev", "socket,id=t0,host=127.0.0.1,port=\(port),server=on,wait=off", "--monitor", "chardev=t0",
                "--pidfile", dir.file("pid"),
            ])
            for _ in 0..<2000 where !FileManager.default.fileExists(atPath: dir.file("pid")) { usleep(10_000) }
            let script = """
            import asyncio, json
            from qemu.qmp import QMPClient
            async def main():
                q = QMPClient('tcp')
                await q.connect(('127.0.0.1', \(port)))
                v = await q.execute('query-version')
                print(json.dumps([v['qemu']['major'], v['qemu']['minor']]))
                await q.disconnect()
            asyncio.run(main())
            """
            let r = try run(["python3", "-c", script], timeout: 30)
            #expect(r.status == 0 && r.stdout == "[7, 2]\n", "\(impl): \(r)")
            #expect(try d.quit() == 0, "\(impl): \(d.stderrText())")
        }
    }

    @Test("live snapshots while an NBD client writes and verifies: nothing lost, the chain grows, every image checks")
    func snapshotsUnderWrites() throws {
        let dir = TempDir()
        try #require(try qemuImg(["create", "-q", "-f", "qcow2", dir.file("base.qcow2"), "64M"]).status == 0)
        try #require(try run(["qemu-io", "-c", "write -P 0x11 0 64M", dir.file("base.qcow2")]).status == 0)
        let d = try DaemonProcess(.lamina, dir: dir.path, args: [
            "--blockdev", "driver=qcow2,node-name=disk,file.driver=file,file.filename=\(dir.path)/base.qcow2",
            "--nbd-server", "addr.type=unix,addr.path=\(dir.path)/nbd.sock",
            "--export", "type=nbd,id=e0,node-name=disk,name=disk,writable=on",
        ])
        let c = try d.qmp()
        let uri = "nbd+unix:///disk?socket=\(dir.path)/nbd.sock"
        // fio writes 4k blocks at random and then reads every one back,
        // checksummed: a write lost or misplaced across a switch fails it.
        let fio = try ChildProcess(["fio", "--name=live", "--verify_state_save=0", "--ioengine=nbd", "--uri=\(uri)",
                                    "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=48M", "--loops=3",
                                    "--verify=crc32c", "--do_verify=1", "--randseed=7"],
                                   stderrPath: dir.file("fio.err"), stdoutPath: dir.file("fio.out"))
        var previous = "disk"
        for i in 1...3 {
            usleep(300_000)
            let r = try c.execute("blockdev-snapshot-sync", [
                "node-name": .string(previous), "snapshot-file": .string(dir.file("s\(i).qcow2")),
                "snapshot-node-name": .string("snap\(i)"),
            ])
            #expect(r["return"] != nil, "\(r)")
            previous = "snap\(i)"
        }
        #expect(fio.wait(timeout: 120) == 0, "fio: \((try? String(contentsOfFile: dir.file("fio.out"), encoding: .utf8)) ?? "")")
        let exports = try c.call("query-block-exports")
        #expect(exports[0]?["node-name"] == "snap3")
        // Reads through the export still see the base where nobody wrote.
        let probe = try run(["qemu-io", "-f", "raw", "-c", "read -P 0x11 60M 4M", uri])
        #expect(probe.status == 0 && !probe.stdout.contains("fail"), "\(probe)")
        #expect(try d.quit(c) == 0, "\(d.stderrText())")
        for f in ["base.qcow2", "s1.qcow2", "s2.qcow2", "s3.qcow2"] {
            let check = try qemuImg(["check", dir.file(f)])
            #expect(check.status == 0, "\(f): \(check)")
        }
        let chain = try qemuImg(["info", "--backing-chain", dir.file("s3.qcow2")])
        #expect(chain.status == 0 && chain.stdout.contains("backing file: \(dir.path)/s2.qcow2")
                && chain.stdout.contains("backing file: \(dir.path)/base.qcow2"), "\(chain)")
        // The whole chain reads as one disk: the base pattern where fio never wrote.
        let flat = try run(["qemu-io", "-r", "-c", "read -P 0x11 60M 4M", dir.file("s3.qcow2")])
        #expect(flat.status == 0 && !flat.stdout.contains("fail"), "\(flat)")
    }
}
