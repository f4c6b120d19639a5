import Foundation
import NBDServer
import TestSupport
import Testing

/// libnbd's tools (nbdinfo, nbdcopy) and fio's nbd engine against the server.
@Suite(.serialized, .timeLimit(.minutes(3)))
struct LibnbdClientTests {
    /// `nbdinfo --map` rows as (offset, length, flags, description).
    func mapRows(_ text: String) -> [[String]] {
        text.split(separator: "\n").map { line in
            let f = line.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
            return Array(f.prefix(3)) + [f.dropFirst(3).joined(separator: " ")]
        }
    }

    @Test func listShowsExportsAndDescriptions() async throws {
        try await withServer { f in
            try f.addMemoryExport("alpha", description: "first disk")
            try f.addMemoryExport("beta", size: 1 << 20, writable: false, allocationDepth: true)
            let r = try await run(["nbdinfo", "--list", f.uri("")])
            #expect(r.status == 0, "\(r)")
            #expect(r.stdout.contains("export=\"alpha\":\n\tdescription: first disk\n\texport-size: 67108864 (64M)"), "\(r)")
            #expect(r.stdout.contains("export=\"beta\":\n\texport-size: 1048576 (1M)"), "\(r)")
            #expect(r.stdout.contains("\t\tbase:allocation\n\t\tqemu:allocation-depth\n"), "\(r)")
            let json = try await run(["nbdinfo", "--json", f.uri("alpha")])
            for field in ["\"can_multi_conn\": true", "\"can_fast_zero\": true", "\"can_df\": true", "\"can_cache\": true",
                          "\"is_rotational\": false", "\"block_size_maximum\": 33554432"] {
                #expect(json.stdout.contains(field), "\(field)\n\(json)")
            }
        }
    }

    @Test func mapReportsHolesAndAllocationDepth() async throws {
        try await withServer { f in
            let backend = try f.addMemoryExport("disk", size: 8 << 20, writable: false, allocationDepth: true,
                                                backingDepth: { $0 >= (2 << 20) && $0 < (3 << 20) ? 2 : 0 })
            backend.fill(0, 1 << 20, with: 1)
            backend.fill(4 << 20, 12345, with: 2)
            let map = try await run(["nbdinfo", "--map", f.uri("disk")])
            #expect(map.status == 0, "\(map)")
            #expect(mapRows(map.stdout) == [
                ["0", "1048576", "0", "data"],
                ["1048576", "3145728", "3", "hole,zero"],
                ["4194304", "16384", "0", "data"],
                ["4210688", "4177920", "3", "hole,zero"],
            ], "\(map)")
            let depth = try await run(["nbdinfo", "--map=qemu:allocation-depth", f.uri("disk")])
            #expect(depth.status == 0, "\(depth)")
            #expect(mapRows(depth.stdout) == [
                ["0", "1048576", "1", "local"],
                ["1048576", "1048576", "0", "absent"],
                ["2097152", "1048576", "2", "backing depth 2"],
                ["3145728", "1048576", "0", "absent"],
                ["4194304", "16384", "1", "local"],
                ["4210688", "4177920", "0", "absent"],
            ], "\(depth)")
        }
    }

    @Test func nbdcopyBothDirections() async throws {
        try await withServer { f in
            try f.addMemoryExport("disk", size: 16 << 20)
            let src = f.dir.file("src.raw"), back = f.dir.file("back.raw")
            // Random MiBs with zero MiBs between them (nbdcopy sends those as zeroes).
            let gen = try await run(["sh", "-c", "for i in $(seq 0 15); do if [ $((i % 3)) = 1 ]; then "
                                     + "head -c 1048576 /dev/zero; else head -c 1048576 /dev/urandom; fi; done > \(src)"])
            #expect(gen.status == 0, "\(gen)")
            let up = try await run(["nbdcopy", src, f.uri("disk")])
            #expect(up.status == 0, "\(up)")
            let down = try await run(["nbdcopy", f.uri("disk"), back])
            #expect(down.status == 0, "\(down)")
            let cmp = try await run(["cmp", src, back])
            #expect(cmp.status == 0, "\(cmp)")
        }
    }

    @Test(arguments: [false, true])
    func fioRandomWritesVerify(tcp: Bool) async throws {
        try await withServer(tcp: tcp) { f in
            try f.addMemoryExport("disk", size: 32 << 20)
            let uri = tcp ? f.tcpURI("disk") : f.uri("disk")
            let r = try await run(["fio", "--name=verify", "--verify_state_save=0", "--ioengine=nbd", "--uri=\(uri)", "--rw=randwrite",
                                   "--bs=4k", "--size=32M", "--io_size=8M", "--iodepth=32", "--verify=crc32c",
                                   "--verify_fatal=1", "--do_verify=1", "--output-format=terse"])
            #expect(r.status == 0, "\(r)")
            let mixed = try await run(["fio", "--name=mixed", "--verify_state_save=0", "--ioengine=nbd", "--uri=\(uri)", "--rw=randrw",
                                       "--bsrange=512-64k", "--size=32M", "--io_size=8M", "--iodepth=8",
                                       "--output-format=terse"])
            #expect(mixed.status == 0, "\(mixed)")
            #expect(!mixed.stderr.contains("error"), "\(mixed)")
        }
    }
}
