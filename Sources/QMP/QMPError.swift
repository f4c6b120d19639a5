import LaminaJSON

/// A QMP error: QEMU's error class (QapiErrorClass) and description.
///
/// Every command failure, argument-visitor failure and protocol-level
/// mistake is one of these; the session encodes it as
/// `{"error": {"class": ..., "desc": ...}}` plus the request's `"id"`.
public struct QMPError: Error, Equatable, Sendable, CustomStringConvertible {
    /// QEMU's error classes (qapi/error.json).
    public enum Class: String, Sendable, Equatable, CaseIterable {
        case genericError = "GenericError"
        case commandNotFound = "CommandNotFound"
        case deviceNotActive = "DeviceNotActive"
        case deviceNotFound = "DeviceNotFound"
        case kvmMissingCap = "KVMMissingCap"
    }

    public var errorClass: Class
    public var desc: String

    public init(_ errorClass: Class, _ desc: String) {
        self.errorClass = errorClass
        self.desc = desc
    }

    /// A GenericError (QEMU's error_setg).
    public init(_ desc: String) {
        self.init(.genericError, desc)
    }

    public static func generic(_ desc: String) -> QMPError { QMPError(.genericError, desc) }

    public var description: String { desc }

    /// The `{"class": ..., "desc": ...}` object.
    public var json: JSON {
        .object([("class", .string(errorClass.rawValue)), ("desc", .string(desc))])
    }

    /// The whole response: `{"error": {...}}`, plus `"id"` when given.
    public func response(id: JSON?) -> JSON {
        var members: [(String, JSON)] = [("error", json)]
        if let id { members.append(("id", id)) }
        return .object(members)
    }
}

// MARK: - QEMU's common error texts (include/qapi/qmp/qerror.h)

extension QMPError {
    /// "Parameter 'x' is missing"
    public static func missingParameter(_ name: String) -> QMPError {
        QMPError("Parameter '\(name)' is missing")
    }

    /// "Invalid parameter type for 'x', expected: T"
    public static func invalidParameterType(_ name: String, expected: String) -> QMPError {
        QMPError("Invalid parameter type for '\(name)', expected: \(expected)")
    }

    /// "Parameter 'x' expects T"
    public static func invalidParameterValue(_ name: String, expects: String) -> QMPError {
        QMPError("Parameter '\(name)' expects \(expects)")
    }

    /// "Parameter 'x' is unexpected"
    public static func unexpectedParameter(_ name: String) -> QMPError {
        QMPError("Parameter '\(name)' is unexpected")
    }

    /// "Parameter 'x' does not accept value 'y'"
    public static func invalidEnumValue(_ name: String, _ value: String) -> QMPError {
        QMPError("Parameter '\(name)' does not accept value '\(value)'")
    }

    /// "Invalid parameter 'x'"
    public static func invalidParameter(_ name: String) -> QMPError {
        QMPError("Invalid parameter '\(name)'")
    }

    /// CommandNotFound "The command x has not been found"
    public static func commandNotFound(_ name: String) -> QMPError {
        QMPError(.commandNotFound, "The command \(name) has not been found")
    }

    /// DeviceNotFound "Device 'x' not found"
    public static func deviceNotFound(_ name: String) -> QMPError {
        QMPError(.deviceNotFound, "Device '\(name)' not found")
    }
}
