import BlockGraph
import Testing

@Suite("DirtyBitmap words and merge")
struct DirtyBitmapWordsTests {
    @Test func setWordsIgnoresBitsPastTheEnd() {
        // 100 granules: word 1 holds granules 64..99, the rest must go.
        let b = DirtyBitmap(size: 100 * 512, granularity: 512)
        b.setWords([1, ~0, 7])
        #expect(b.snapshotWords() == [1, (UInt64(1) << 36) - 1])
        #expect(b.dirtyBytes == (1 + 36) * 512)
        b.clearAll()
        #expect(b.isClean && b.snapshotWords() == [0, 0])
    }

    @Test func mergeSameGranularityIsAnOr() {
        let a = DirtyBitmap(size: 1 << 20, granularity: 4096)
        let b = DirtyBitmap(size: 1 << 20, granularity: 4096)
        a.mark(0, 4096)
        b.mark(8192, 8192)
        a.merge(from: b)
        #expect(a.dirtyBytes == 3 * 4096)
        #expect(a.nextDirtyRun(from: 4096, maxLength: 1 << 20)! == (8192, 8192))
    }

    @Test func mergeOtherGranularityMarksOverlappingGranules() {
        let coarse = DirtyBitmap(size: 1 << 22, granularity: 1 << 20)
        let fine = DirtyBitmap(size: 1 << 22, granularity: 512)
        fine.mark(3 << 20, 512)            // one fine granule in coarse granule 3
        coarse.merge(from: fine)
        #expect(coarse.nextDirtyRun(from: 0, maxLength: 1 << 22)! == (3 << 20, 1 << 20))
        let back = DirtyBitmap(size: 1 << 22, granularity: 512)
        back.merge(from: coarse)           // the whole coarse granule, finely
        #expect(back.dirtyBytes == 1 << 20)
    }
}
