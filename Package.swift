// swift-tools-version:6.1
import PackageDescription

let strict: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("MemberImportVisibility"),
]

let package = Package(
    name: "Lamina",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "lamina-img", targets: ["lamina-img"]),
        .executable(name: "lamina-io", targets: ["lamina-io"]),
        .executable(name: "lamina-storage-daemon", targets: ["lamina-storage-daemon"]),
        .library(name: "BlockDrivers", targets: ["BlockDrivers"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-collections", from: "1.1.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
    ],
    targets: [
        // The one place that talks to libc beyond what Glibc exports cleanly,
        // plus zlib/zstd wrappers (opaque C API, no system-library module maps).
        .target(
            name: "CLaminaSys",
            linkerSettings: [.linkedLibrary("z"), .linkedLibrary("zstd")]
        ),
        .target(
            name: "BlockCore",
            dependencies: [.product(name: "DequeModule", package: "swift-collections")],
            swiftSettings: strict
        ),
        .target(name: "BlockIO", dependencies: ["BlockCore", "CLaminaSys"], swiftSettings: strict),
        .target(name: "BlockGraph", dependencies: ["BlockCore", "BlockIO"], swiftSettings: strict),
        .target(name: "FileDriver", dependencies: ["BlockCore", "BlockIO", "BlockGraph", "CLaminaSys"], swiftSettings: strict),
        .target(name: "RawDriver", dependencies: ["BlockCore", "BlockIO", "BlockGraph"], swiftSettings: strict),
        .target(name: "Qcow2", dependencies: ["BlockCore", "BlockIO", "BlockGraph", "CLaminaSys"], swiftSettings: strict),
        // The copy engine every job copies with (chunked, bitmap-driven, rate-limited).
        .target(name: "BlockCopy", dependencies: ["BlockCore", "BlockIO", "BlockGraph"], swiftSettings: strict),
        // The copy-on-read filter driver (block-stream inserts one).
        .target(name: "CopyOnReadDriver", dependencies: ["BlockCore", "BlockGraph"], swiftSettings: strict),
        // The blkdebug fault-injection filter (rules keyed on the drivers' debug events).
        .target(name: "BlkdebugDriver", dependencies: ["BlockCore", "BlockGraph", "LaminaJSON"], swiftSettings: strict),
        // The job core (QEMU's job.c) and the block jobs: stream, commit, create, transactions.
        .target(
            name: "BlockJobs",
            dependencies: ["BlockCore", "BlockIO", "BlockGraph", "BlockCopy", "CopyOnReadDriver"],
            swiftSettings: strict
        ),
        .target(
            name: "BlockDrivers",
            dependencies: ["BlockCore", "BlockIO", "BlockGraph", "FileDriver", "RawDriver", "Qcow2"],
            swiftSettings: strict
        ),
        // JSON values with ordered members, QEMU's parser dialect and printers.
        .target(name: "LaminaJSON", swiftSettings: strict),
        // Image info (qemu-img info, query-named-block-nodes) from driver capabilities.
        .target(
            name: "BlockInfo",
            dependencies: ["BlockCore", "BlockGraph", "BlockDrivers", "LaminaJSON"],
            swiftSettings: strict
        ),
        // SwiftNIO glue shared by the servers: event loops as task executors, addresses.
        .target(
            name: "ServerKit",
            dependencies: [
                "BlockCore",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: strict
        ),
        // QMP: framing, session state machine, argument visitor, events, server.
        .target(
            name: "QMP",
            dependencies: [
                "LaminaJSON", "ServerKit",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: strict
        ),
        // Pure NBD codecs (no sockets).
        .target(name: "NBDProtocol", dependencies: ["BlockCore"], swiftSettings: strict),
        .target(
            name: "NBDServer",
            dependencies: [
                "BlockCore", "NBDProtocol", "ServerKit",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: strict
        ),
        .target(
            name: "StorageDaemon",
            dependencies: [
                "BlockCore", "BlockIO", "BlockGraph", "BlockDrivers", "BlockInfo", "FileDriver", "RawDriver", "Qcow2",
                "BlkdebugDriver", "CopyOnReadDriver", "LaminaJSON", "QMP", "NBDProtocol", "NBDServer", "ServerKit", "BlockCopy", "BlockJobs",
                "CLaminaSys",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: strict
        ),
        .executableTarget(name: "lamina-storage-daemon", dependencies: ["StorageDaemon"], swiftSettings: strict),
        .target(
            name: "ImgTool",
            dependencies: [
                "BlockCopy",
                "BlockCore", "BlockIO", "BlockGraph", "BlockDrivers", "BlockInfo", "Qcow2", "FileDriver", "RawDriver",
                "LaminaJSON",
            ],
            swiftSettings: strict
        ),
        .executableTarget(name: "lamina-img", dependencies: ["ImgTool"], swiftSettings: strict),
        .executableTarget(name: "lamina-io", dependencies: ["ImgTool"], swiftSettings: strict),
        .target(name: "TestSupport", dependencies: ["CLaminaSys"], path: "Tests/TestSupport", swiftSettings: strict),
        .testTarget(
            name: "BlockCoreTests",
            dependencies: ["BlockCore", "BlockIO", "BlockGraph", "BlockCopy"],
            swiftSettings: strict
        ),
        .testTarget(
            name: "BlkdebugDriverTests",
            dependencies: ["BlockCore", "BlockGraph", "BlkdebugDriver"],
            swiftSettings: strict
        ),
        .testTarget(
            name: "Qcow2Tests",
            dependencies: ["BlockCore", "BlockIO", "BlockGraph", "Qcow2", "BlockDrivers", "FileDriver", "TestSupport"],
            swiftSettings: strict
        ),
        .testTarget(
            name: "QMPTests",
            dependencies: [
                "LaminaJSON", "QMP", "ServerKit", "TestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
            ],
            swiftSettings: strict
        ),
        .testTarget(
            name: "NBDTests",
            dependencies: [
                "BlockCore", "NBDProtocol", "NBDServer", "ServerKit", "TestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
            ],
            swiftSettings: strict
        ),
        .testTarget(
            name: "DaemonTests",
            dependencies: [
                "BlockCore", "BlockGraph", "BlockDrivers", "BlockJobs", "LaminaJSON", "QMP", "NBDServer", "StorageDaemon",
                "TestSupport",
            ],
            swiftSettings: strict
        ),
        .testTarget(
            name: "InteropTests",
            dependencies: ["BlockCore", "BlockIO", "BlockGraph", "BlockDrivers", "Qcow2", "ImgTool", "TestSupport"],
            swiftSettings: strict
        ),
    ]
)
