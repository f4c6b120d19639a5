#if canImport(Glibc)
import Glibc
#endif

/// QEMU's RateLimit with 100 ms slices: how long to wait after `n` bytes
/// so that throughput stays at `speed` bytes per second. Jobs keep one
/// (their `speed`); `BlockCopy` asks for the delay after every copy.
public struct RateLimit: Sendable {
    public static let sliceNs: UInt64 = 100_000_000
    var sliceStart: UInt64 = 0
    var sliceEnd: UInt64 = 0
    var dispatched: UInt64 = 0

    public init() {}

    /// Records `n` bytes sent at `now` and returns the nanoseconds to wait
    /// (QEMU's ratelimit_calculate_delay); 0 when `speed` is 0 (no limit).
    public mutating func delay(speed: UInt64, bytes n: UInt64, now: UInt64) -> UInt64 {
        guard speed > 0 else { return 0 }
        let quota = max(1, Double(speed) * Double(Self.sliceNs) / 1e9)
        if sliceEnd < now {
            // The last (possibly stretched) slice is over: start afresh.
            sliceStart = now
            sliceEnd = now + Self.sliceNs
            dispatched = 0
        }
        dispatched += n
        if Double(dispatched) < quota { return 0 }
        // Over quota: this slice lasts as long as its bytes are worth.
        sliceEnd = sliceStart + UInt64(Double(dispatched) / quota * Double(Self.sliceNs))
        return sliceEnd > now ? sliceEnd - now : 0
    }
}

/// CLOCK_MONOTONIC in nanoseconds.
public func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}
