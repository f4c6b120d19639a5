import Foundation
import LaminaJSON
import QMP
import TestSupport
import Testing

/// Drives our server with Python's qemu.qmp (the library QEMU's own test
/// suite uses): greeting parsing, negotiation (it enables "oob" when
/// offered), ids, errors as ExecuteError, events. Not skipped: CI installs
/// qemu.qmp with pip.
@Suite(.timeLimit(.minutes(2))) struct PythonClientTests {
    static let script = #"""
    import asyncio, json, sys
    from qemu.qmp import QMPClient, ExecuteError

    async def main(path):
        out = {}
        qmp = QMPClient('lamina-test')
        await qmp.connect(path)
        out['greeting'] = qmp.greeting._asdict() if hasattr(qmp.greeting, '_asdict') else dict(qmp.greeting)
        out['version'] = await qmp.execute('query-version')
        out['echo'] = await qmp.execute('echo', {'value': {'nested': [1, 'two', None, True, 1.5]}})
        try:
            await qmp.execute('no-such-command')
        except ExecuteError as e:
            out['unknown'] = {'class': e.error_class, 'desc': e.error.error.desc}
        try:
            await qmp.execute('blockdev-del')
        except ExecuteError as e:
            out['missing'] = {'class': e.error_class, 'desc': e.error.error.desc}
        with qmp.listener('TEST_EVENT') as listener:
            await qmp.execute('emit', {'event': 'TEST_EVENT', 'data': {'n': 7}})
            ev = await asyncio.wait_for(listener.get(), 10)
            out['event'] = {'event': ev['event'], 'data': ev['data'], 'has_ts': 'seconds' in ev['timestamp']}
        results = await asyncio.gather(*(qmp.execute('sleep', {'ms': 50}) for _ in range(3)))
        out['pipelined'] = results
        await qmp.disconnect()
        print(json.dumps(out))

    asyncio.run(main(sys.argv[1]))
    """#

    @Test func qemuQMPLibraryTalksToOurServer() async throws {
        let t = TestServer()
        let path = try await t.listen()
        let scriptPath = t.dir.file("client.py")
        try PythonClientTests.script.write(toFile: scriptPath, atomically: true, encoding: .utf8)
        let r = try await blocking { try runProcess(["python3", scriptPath, path], timeout: 60) }
        let (status, stdout, stderr) = (r.status, r.stdout, r.stderr)
        #expect(status == 0, "\(stderr)")
        let out = try JSON.parse(stdout.trimmingCharacters(in: .whitespacesAndNewlines))
        #expect(out["version"]?["qemu"]?["major"] == 7)
        #expect(out["echo"]?["value"] == ["nested": [1, "two", .null, true, 1.5]])
        #expect(out["unknown"] == ["class": "CommandNotFound", "desc": "The command no-such-command has not been found"])
        #expect(out["missing"] == ["class": "GenericError", "desc": "Parameter 'node-name' is missing"])
        #expect(out["event"] == ["event": "TEST_EVENT", "data": ["n": 7], "has_ts": true])
        #expect(out["pipelined"] == [["slept": 50], ["slept": 50], ["slept": 50]])
        await t.shutdown()
    }
}
