import BlockGraph
import Testing

@Suite("DirtyBitmap")
struct DirtyBitmapTests {
    @Test func marksWholeGranulesAndFindsRuns() {
        let b = DirtyBitmap(size: 1 << 20, granularity: 65536)
        #expect(b.isClean && b.dirtyBytes == 0)
        b.mark(100, 10)             // granule 0
        b.mark(65536 * 3 - 1, 2)    // granules 2 and 3
        #expect(b.dirtyBytes == 3 * 65536)
        #expect(b.nextDirtyRun(from: 0, maxLength: 1 << 20)! == (0, 65536))
        #expect(b.nextDirtyRun(from: 65536, maxLength: 1 << 20)! == (2 * 65536, 2 * 65536))
        #expect(b.nextDirtyRun(from: 65536, maxLength: 65536)! == (2 * 65536, 65536))
        #expect(b.nextDirtyRun(from: 4 * 65536, maxLength: 1 << 20) == nil)
    }

    @Test func clearsOnlyWholeGranules() {
        let b = DirtyBitmap(size: 1 << 20, granularity: 65536)
        b.markAll()
        #expect(b.dirtyBytes == 1 << 20)
        b.clear(1, 65536)           // no whole granule inside
        #expect(b.dirtyBytes == 1 << 20)
        b.clear(0, 3 * 65536)
        #expect(b.nextDirtyRun(from: 0, maxLength: 1 << 20)! == (3 * 65536, 13 * 65536))
        b.clear(3 * 65536, 1 << 20) // past the end clears the tail
        #expect(b.isClean)
    }

    @Test func lastGranuleIsClippedToTheSize() {
        let b = DirtyBitmap(size: 100_000, granularity: 65536)
        b.mark(99_999, 1)
        #expect(b.nextDirtyRun(from: 0, maxLength: 1 << 20)! == (65536, 100_000 - 65536))
        #expect(b.dirtyBytes == 100_000 - 65536)
        b.mark(200_000, 10)         // beyond the node: ignored
        #expect(b.nextDirtyRun(from: 0, maxLength: 1 << 20)! == (65536, 100_000 - 65536))
    }
}
