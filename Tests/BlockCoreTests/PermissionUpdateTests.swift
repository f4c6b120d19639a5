import BlockCore
import BlockGraph
import Synchronization
import Testing

/// A driver without data: children, an optional refusal of permissions
/// (as a file node whose lock another process holds), and a record of
/// what the permission update applied to it.
final class EdgeDriver: BlockDriver, @unchecked Sendable {
    let formatName: String
    let children: [BlockChild]
    let isFilter: Bool
    /// setPermissions fails when asked for any of these.
    let refuse: BlockPermissions
    let applied = Mutex<(perm: BlockPermissions, shared: BlockPermissions)>(([], .all))
    var length: Int64 { 1 << 20 }

    init(_ name: String, children: [BlockChild] = [], isFilter: Bool = false, refuse: BlockPermissions = []) {
        formatName = name
        self.children = children
        self.isFilter = isFilter
        self.refuse = refuse
    }

    func setPermissions(_ perm: BlockPermissions, shared: BlockPermissions) throws(BlockError) -> (@Sendable () -> Void)? {
        if !perm.isDisjoint(with: refuse) {
            throw BlockError(.busy, errno: 11, "Failed to get \"\(perm.intersection(refuse).humanNames)\" lock")
        }
        let old = applied.withLock { a -> (BlockPermissions, BlockPermissions) in
            defer { a = (perm, shared) }
            return a
        }
        return { [self] in applied.withLock { $0 = old } }
    }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws(BlockError) {}
    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws(BlockError) {}
    func writeZeroes(at offset: Int64, length: Int64, flags: WriteFlags) async throws(BlockError) {}
    func discard(at offset: Int64, length: Int64) async throws(BlockError) {}
    func flush() async throws(BlockError) {}
    func blockStatus(at offset: Int64, length: Int64) async throws(BlockError) -> BlockStatus {
        BlockStatus(flags: [.data], length: length)
    }
    func close() async throws(BlockError) {}
}

/// A parent that is neither a node nor a backend (a job holding edges).
final class TestJobParent: BlockParent {
    let parentDescription: String
    var staysAtNode: Bool { true }
    init(_ d: String) { parentDescription = d }
    func drainBegin() async {}
    func drainEnd() {}
}

@Suite("Permission update (QEMU's bdrv_refresh_perms)")
struct PermissionUpdateTests {
    /// A "file" node and a format node over it with the qcow2 file role.
    func formatOverFile(_ name: String = "fmt", readOnly: Bool = false,
                        refuse: BlockPermissions = []) -> (BlockNode, BlockNode) {
        let file = BlockNode(driver: EdgeDriver("file", refuse: refuse), filename: "f", readOnly: readOnly, nodeName: "f")
        let fmt = BlockNode(driver: EdgeDriver("qcow2", children: [BlockChild(name: "file", role: .image, node: file)]),
                            filename: "f", readOnly: readOnly, nodeName: name)
        return (fmt, file)
    }

    @Test("a format node's file edge: consistent read, and write and resize when writable; others may only read")
    func storagePermissions() throws {
        let (rw, rwFile) = formatOverFile()
        try PermissionUpdate.refresh([rw])
        #expect(rw.children[0].perm == [.consistentRead, .write, .resize])
        #expect(rw.children[0].shared == [.consistentRead, .writeUnchanged])
        #expect((rwFile.driver as! EdgeDriver).applied.withLock { $0.perm } == [.consistentRead, .write, .resize])
        let (ro, _) = formatOverFile(readOnly: true)
        try PermissionUpdate.refresh([ro])
        #expect(ro.children[0].perm == [.consistentRead])
        #expect(ro.children[0].shared == [.consistentRead, .writeUnchanged])
    }

    @Test("a backing edge: consistent read only if the overlay's users read; writes below allowed if they cope")
    func cowPermissions() throws {
        let base = BlockNode(driver: EdgeDriver("qcow2"), filename: "b", readOnly: true, nodeName: "base")
        let top = BlockNode(driver: EdgeDriver("qcow2", children: [BlockChild(name: "backing", role: .cow, node: base)]),
                            filename: "t", readOnly: false, nodeName: "top")
        try PermissionUpdate.refresh([top])
        #expect(top.children[0].perm == [])
        #expect(top.children[0].shared == .all)
        let blk = BlockBackend(node: top, perm: [.consistentRead], shared: [.consistentRead, .writeUnchanged])
        blk.root.attach(to: blk)
        try PermissionUpdate.refresh([top])
        #expect(top.children[0].perm == [.consistentRead])
        #expect(top.children[0].shared == [.consistentRead, .writeUnchanged])
    }

    @Test("two writers of one file: QEMU's conflict message, the newest parent first")
    func conflict() throws {
        let (a, file) = formatOverFile("a")
        try PermissionUpdate.refresh([a])
        file.retain()
        let b = BlockNode(driver: EdgeDriver("qcow2", children: [BlockChild(name: "file", role: .image, node: file)]),
                          filename: "f", readOnly: false, nodeName: "b")
        // The new parent's edge gets its permissions from the parent (QEMU's
        // attach), then the file's parents are checked against each other.
        do throws(BlockError) {
            try PermissionUpdate.refresh([b])
            Issue.record("no conflict")
        } catch {
            #expect(error.message == "Permission conflict on node 'f': permissions 'write, resize' are both required by node 'a' (uses node 'f' as 'file' child) and unshared by node 'b' (uses node 'f' as 'file' child).")
        }
        // Nothing changed: b's edge takes nothing.
        #expect(b.children[0].perm == [])
    }

    @Test("a writer of a read-only node: 'Block node is read-only'")
    func readOnlyWriter() throws {
        let (fmt, _) = formatOverFile(readOnly: true)
        let blk = BlockBackend(node: fmt, perm: [.consistentRead, .write], shared: .all)
        blk.root.attach(to: blk)
        #expect(throws: BlockError.self) { try PermissionUpdate.refresh([fmt]) }
        do throws(BlockError) {
            try PermissionUpdate.refresh([fmt])
        } catch {
            #expect(error.message == "Block node is read-only")
        }
    }

    @Test("a refusal further down undoes every edge and lock already changed")
    func rollback() throws {
        let file = BlockNode(driver: EdgeDriver("file", refuse: [.write]), filename: "f", readOnly: false, nodeName: "f")
        let filter = BlockNode(driver: EdgeDriver("filter", children: [BlockChild(name: "file", role: [.filtered, .primary], node: file)],
                                                  isFilter: true), filename: "f", readOnly: false, nodeName: "flt")
        let reader = BlockBackend(node: filter, perm: [.consistentRead], shared: .all)
        reader.root.attach(to: reader)
        try PermissionUpdate.refresh([filter])
        #expect(filter.children[0].perm == [.consistentRead])
        #expect((filter.driver as! EdgeDriver).applied.withLock { $0.perm } == [.consistentRead])
        // A writer: the filter's edge gets write, then the file refuses it;
        // everything goes back to the reader's state.
        let writer = BlockBackend(node: filter, perm: [.consistentRead, .write], shared: .all)
        writer.root.attach(to: writer)
        do throws(BlockError) {
            try PermissionUpdate.refresh([filter])
            Issue.record("the file accepted write")
        } catch {
            #expect(error.message == "Failed to get \"write\" lock")
        }
        #expect(filter.children[0].perm == [.consistentRead])
        #expect((filter.driver as! EdgeDriver).applied.withLock { $0.perm } == [.consistentRead])
        #expect((file.driver as! EdgeDriver).applied.withLock { $0.perm } == [.consistentRead])
    }

    @Test("a filter passes its users' permissions through; a job's edge that does not share write refuses a writer")
    func filterAndJobEdge() throws {
        let (fmt, _) = formatOverFile()
        let filter = BlockNode(driver: EdgeDriver("filter", children: [BlockChild(name: "file", role: [.filtered, .primary], node: fmt)],
                                                  isFilter: true), filename: "f", readOnly: false, nodeName: "flt")
        let blk = BlockBackend(node: filter, perm: [.consistentRead, .write], shared: [.consistentRead, .write, .writeUnchanged])
        blk.root.attach(to: blk)
        try PermissionUpdate.refresh([filter])
        #expect(filter.children[0].perm == [.consistentRead, .write])
        #expect(filter.children[0].shared == [.consistentRead, .write, .writeUnchanged])
        // A job that lets others only read the node.
        fmt.retain()
        let job = TestJobParent("stream job 'j0'")
        let edge = BlockChild(name: "intermediate node", role: [], node: fmt)
        edge.setPermissions([], [.consistentRead, .writeUnchanged])
        edge.attach(to: job)
        do throws(BlockError) {
            try PermissionUpdate.refresh([fmt])
            Issue.record("no conflict")
        } catch {
            #expect(error.message == "Permission conflict on node 'fmt': permissions 'write' are both required by node 'flt' (uses node 'fmt' as 'file' child) and unshared by stream job 'j0' (uses node 'fmt' as 'intermediate node' child).")
        }
    }

    @Test("op blockers: the newest blocker speaks, the ops it lets through pass, removal by owner")
    func opBlockers() throws {
        let node = BlockNode(driver: EdgeDriver("qcow2"), filename: "n", readOnly: false, nodeName: "n")
        let owner1 = TestJobParent("a"), owner2 = TestJobParent("b")
        node.block(OpBlocker("node is used as backing hd of 'x'"), except: [.stream], owner: owner1)
        try node.checkOp(.stream)
        #expect(throws: BlockError.self) { try node.checkOp(.driveDel) }
        node.block(OpBlocker("block device is in use by block job: commit"), owner: owner2)
        do throws(BlockError) {
            try node.checkOp(.stream)
        } catch {
            #expect(error.message == "Node 'n' is busy: block device is in use by block job: commit")
        }
        node.unblock(owner: owner2)
        try node.checkOp(.stream)
        node.unblock(owner: owner1)
        #expect(!node.hasOpBlockers)
    }
}
