import BlockIO

enum IOThreadPoolBox {
    static let shared = IOThreadPool(count: 4, name: "test-io")
}
