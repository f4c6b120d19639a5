import LaminaJSON

/// qemu-img's progress line ("    (42.00/100%)\r" on stdout), printed when
/// the value moves by at least `minSkip` percent, and at 0 and 100.
final class Progress {
    private var current: Float = 0
    private var lastPrint: Float = 0
    private let minSkip: Float
    private let enabled: Bool

    init(enabled: Bool, minSkip: Float = 1.0) {
        self.enabled = enabled
        self.minSkip = minSkip
    }

    /// `delta` percent of `max` more (QEMU's qemu_progress_print).
    func advance(_ delta: Float, max: Int) {
        guard enabled else { return }
        var c = max == 0 ? delta : current + delta / 100 * Float(max)
        if c > 100 { c = 100 }
        current = c
        if c > lastPrint + minSkip || c < lastPrint - minSkip || c == 0 || c == 100 {
            lastPrint = c
            out("    (" + cPrintf("%3.2f", Double(c)) + "/100%)\r")
            StdoutBuffer.shared.flush()
        }
    }

    func end() {
        guard enabled else { return }
        out("\n")
    }
}
