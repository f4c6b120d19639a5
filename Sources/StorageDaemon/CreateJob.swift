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

/// The blockdev-create job (type "create"): formats a file or node, then
/// concludes; it is dismissed by the user (QEMU's JOB_MANUAL_DISMISS).
final class CreateJobDriver: JobDriver, Sendable {
    let options: CreateOptions
    /// For qcow2 with a node reference: resolved before the job starts,
    /// so a missing node fails the job the way QEMU does.
    let resolveNode: @Sendable (String) async -> BlockNode?

    init(options: CreateOptions, resolveNode: @escaping @Sendable (String) async -> BlockNode?) {
        self.options = options
        self.resolveNode = resolveNode
    }

    var type: JobType { .create }

    func run(_ job: Job) async throws(BlockError) {
        job.progressSetRemaining(1)
        // QEMU counts the one step as done whether or not it succeeded.
        defer { job.progressUpdate(1) }
        switch options {
        case .file(let filename, let size, let prealloc):
            try await createFile(filename, size, prealloc)
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

    private func createFile(_ path: String, _ size: Int64, _ prealloc: Preallocation) async throws(BlockError) {
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
