import BlockIO

/// `lamina-img`: qemu-img 7.2's command line over the Lamina block layer.
public enum LaminaImg {
    /// Runs the command on a dedicated I/O thread: its file syscalls block,
    /// which the cooperative pool must never do.
    public static func main(_ argv: [String]) async -> Int32 {
        let thread = IOThread(name: "lamina-img")
        defer { thread.shutdown() }
        return await withTaskExecutorPreference(thread) {
            await run(argv)
        }
    }

    static func run(_ argv: [String]) async -> Int32 {
        let prog = argv.first.map { String($0.split(separator: "/").last ?? "lamina-img") } ?? "lamina-img"
        ProgName.current = prog
        let ctx = ToolContext(progName: prog)
        let args = Array(argv.dropFirst())
        guard let cmd = args.first else {
            return ctx.report(ctx.usage("Not enough arguments"))
        }
        let rest = Array(args.dropFirst())
        let status: Int32
        do throws(ToolError) {
            switch cmd {
            case "-h", "--help":
                outln(helpText(prog))
                status = 0
            case "info": status = try await InfoCommand.run(rest, ctx)
            case "check": status = try await CheckCommand.run(rest, ctx)
            case "map": status = try await MapCommand.run(rest, ctx)
            case "compare": status = try await CompareCommand.run(rest, ctx)
            case "create": status = try await CreateCommand.run(rest, ctx)
            case "convert": status = try await ConvertCommand.run(rest, ctx)
            case "amend": status = try await AmendCommand.run(rest, ctx)
            case "snapshot": status = try await SnapshotCommand.run(rest, ctx)
            case "resize": status = try await ResizeCommand.run(rest, ctx)
            case "measure": status = try await MeasureCommand.run(rest, ctx)
            case "commit": status = try await CommitCommand.run(rest, ctx)
            case "rebase": status = try await RebaseCommand.run(rest, ctx)
            case "bitmap": status = try await BitmapCommand.run(rest, ctx)
            case "-V", "--version":
                outln("\(prog) version 7.2.0 (Lamina)")
                status = 0
            default:
                throw ctx.usage("Command not found: \(cmd)")
            }
        } catch {
            StdoutBuffer.shared.flush()
            if error.message.isEmpty { return error.exitCode }
            return ctx.report(error)
        }
        StdoutBuffer.shared.flush()
        return status
    }

    static func helpText(_ prog: String) -> String {
        """
        \(prog) - QEMU disk image utility, rebuilt in Swift (Lamina)
        usage: \(prog) [standard options] command [command options]

        Command syntax:
          amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename
          bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b source_file [-F source_fmt]] [-g granularity] [--object objectdef] [--image-opts | -f fmt] filename bitmap
          check [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-U] filename
          commit [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename
          compare [-f fmt] [-F fmt] [-p] [-q] [-s] [-U] filename1 filename2
          convert [--bitmaps [--skip-broken-bitmaps]] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] [-B backing_file [-F backing_fmt]] [-o options] [-l snapshot_param] [-S sparse_size] [-m num_coroutines] [-W] [-U] filename [filename2 [...]] output_filename
          create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]
          info [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename
          map [--output=ofmt] [-f fmt] [--start-offset=offset] [--max-length=len] [-U] filename
          measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [-f fmt] [-l snapshot_param] filename]
          snapshot [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename
          rebase [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] filename
          resize [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size
        """
    }
}
