#if canImport(Glibc)
import Glibc
#endif
import BlockCore
import BlockDrivers
import BlockGraph
import BlockJobs
import FileDriver
import Qcow2

/// QAPI BlockdevCreateOptions for the drivers Lamina creates.
enum CreateOptions: Sendable {
    case file(filename: String, size: Int64, preallocation: Preallocation)
    /// `file` names an existing node (or nested options) to format.
    case qcow2(file: BlockdevRef, options: Qcow2CreateOptions)
}

extension CreateOptions {
    /// The driver's create function for the blockdev-create job (QEMU's
    /// bdrv_co_create of the driver named by the options). A node named
    /// by reference is looked up when the job runs, so a missing node
    /// fails the job the way QEMU's does.
    func createFunction(resolveNode: @escaping @Sendable (String) async -> BlockNode?) -> @Sendable () async throws(BlockError) -> Void {
        let options = self
        return { () async throws(BlockError) in
            switch options {
            case .file(let filename, let size, let prealloc):
                try await Self.createFile(filename, size, prealloc)
            case .qcow2(let ref, let o):
                try o.validate()
                switch ref {
                case .reference(let name):
                    guard let node = await resolveNode(name) else {
                        throw BlockError(.notFound, errno: ENOENT, "Cannot find device='\(name)' nor node-name='\(name)'")
                    }
                    if node.readOnly {
                        throw BlockError(.permissionDenied, errno: EPERM, "Block node is read-only")
                    }
                    try await ImageCreator.formatQcow2(on: node, options: o)
                case .options(let bo):
                    guard case .file(let f) = bo.driver else {
                        throw BlockError.unsupported("blockdev-create: only a 'file' node can hold a new qcow2 image")
                    }
                    try await ImageCreator.createQcow2(path: f.filename, options: o)
                }
            }
        }
    }

    private static func createFile(_ path: String, _ size: Int64, _ prealloc: Preallocation) async throws(BlockError) {
        if prealloc == .metadata {
            throw BlockError.unsupported("Unsupported preallocation mode: metadata")
        }
        let node = try ImageCreator.createHostFile(path)
        do throws(BlockError) {
            try await node.truncate(to: size, preallocation: prealloc)
            try await node.flush()
        } catch {
            try? await node.close()
            throw error.prefixed("Could not resize file: ")
        }
        try await node.close()
    }
}
