import LaminaJSON
import QMP
import Testing

/// util/keyval.c syntax; error texts as qemu-storage-daemon 7.2 printed
/// them for `--blockdev <text>` (implied key "driver").
@Suite struct KeyValTests {
    private func parse(_ s: String, implied: String? = "driver") throws(QMPError) -> JSON {
        try KeyVal.parse(s, impliedKey: implied).object
    }

    private func error(_ s: String, implied: String? = "driver") -> String? {
        do { _ = try KeyVal.parse(s, impliedKey: implied); return nil } catch { return error.desc }
    }

    @Test func nestingListsAndEscapes() throws {
        #expect(try parse("a.b=1,c=x", implied: nil) == ["a": ["b": "1"], "c": "x"])
        #expect(try parse("driver=file,filename=/x,,y,,,,z") == ["driver": "file", "filename": "/x,y,,z"])
        #expect(try parse("file,filename=/x") == ["driver": "file", "filename": "/x"])
        #expect(try parse("x.0=a,x.1=b,d=") == ["x": ["a", "b"], "d": ""])
        #expect(try parse("x.1.n=b,x.0.n=a") == ["x": [["n": "a"], ["n": "b"]]])
        #expect(try parse("a=1,a=2") == ["a": "2"])
        #expect(try parse("a=1,") == ["a": "1"])
        #expect(try parse("__com.redhat_x=1") == ["__com.redhat_x": "1"])
        #expect(try parse("") == .emptyObject)
    }

    @Test func errors() {
        #expect(error("driver=file,filename=/x,=1") == "Invalid parameter ''")
        #expect(error(",driver=file") == "Invalid parameter ''")
        #expect(error("driver=file,filename=/x,a") == "Expected '=' after parameter 'a'")
        #expect(error("driver=file,a.=1") == "Invalid parameter 'a.'")
        #expect(error("driver=file,1=2") == "Invalid parameter '1'")
        #expect(error("driver=file,a.1b=2") == "Invalid parameter 'a.1b'")
        #expect(error("driver=file,a..b=2") == "Invalid parameter 'a..b'")
        #expect(error("driver=file,cache.direct=on,cache=x") == "Parameters 'cache.*' used inconsistently")
        #expect(error("driver=file,cache=x,cache.direct=on") == "Parameters 'cache.*' used inconsistently")
        #expect(error("driver=file,a.b.c=1,a.b=2") == "Parameters 'a.b.*' used inconsistently")
        #expect(error("driver=file,x.0=a,x.a=b") == "Parameters 'x.*' used inconsistently")
        #expect(error("driver=file,x.0=a,x.0.y=b") == "Parameters 'x.0.*' used inconsistently")
        #expect(error("driver=file,x=a,x.0=b") == "Parameters 'x.*' used inconsistently")
        #expect(error("driver=file,x.0=a,x.2=b") == "Parameter 'x.1' missing")
        #expect(error("driver=file,x.1=a") == "Parameter 'x.0' missing")
        let long = String(repeating: "k", count: 130)
        #expect(error("driver=file,\(long)=1") == "Parameter '\(long)' is too long")
        #expect(error("driver=file,a.\(long)=1") == "Parameter fragment '\(long)' is too long")
    }

    @Test func help() throws {
        #expect(try KeyVal.parse("help", impliedKey: "driver").help)
        #expect(try KeyVal.parse("driver=file,help", impliedKey: "driver").help)
        #expect(try KeyVal.parse("?", impliedKey: "driver").help)
        #expect(throws: QMPError("Help is not available for this option")) {
            try QAPIInput.fromOption("driver=file,help", impliedKey: "driver")
        }
    }

    @Test func optionArgumentsStartingWithBraceAreJSON() throws {
        let input = try QAPIInput.fromOption(#"{"driver":"file","filename":"/x"}"#, impliedKey: "driver")
        #expect(input.mode == .qobject)
        #expect(try input.string("driver") == "file")
        #expect(throws: QMPError("JSON parse error, premature EOI")) {
            try QAPIInput.fromOption(#"{"driver":"file""#, impliedKey: "driver")
        }
        #expect(throws: QMPError("Invalid parameter type for 'filename', expected: string")) {
            let i = try QAPIInput.fromOption(#"{"driver":"file","filename":1}"#)
            _ = try i.string("driver")
            _ = try i.string("filename")
        }
    }
}

/// QemuOpts (--chardev); texts from qemu-storage-daemon 7.2.
@Suite struct QemuOptsTests {
    @Test func chardevSyntax() throws {
        let o = try QemuOpts.parse("socket,id=c,path=/tmp/a,,b.sock,server=on,wait=off", spec: .chardev)
        #expect(o.id == "c")
        #expect(o["backend"] == "socket" && o["path"] == "/tmp/a,b.sock")
        #expect(try o.bool("server") == true && o.bool("wait") == false && o.bool("telnet") == nil)
        let last = try QemuOpts.parse("socket,id=c,path=/a,path=/b", spec: .chardev)
        #expect(last["path"] == "/b")
        let flags = try QemuOpts.parse("socket,id=c,path=/a,server,nowait", spec: .chardev)
        #expect(try flags.bool("server") == true && flags.bool("wait") == false)
        #expect(flags.warnings == [
            "short-form boolean option 'server' deprecated\nPlease use server=on instead",
            "short-form boolean option 'nowait' deprecated\nPlease use wait=off instead",
        ])
    }

    @Test func chardevErrors() {
        func error(_ s: String) -> String? {
            do { _ = try QemuOpts.parse(s, spec: .chardev); return nil } catch { return error.desc }
        }
        #expect(error("socket,id=c,path=/a,foo=1") == "Invalid parameter 'foo'")
        #expect(error("socket,id=c,path=/a,=x") == "Invalid parameter ''")
        #expect(error("socket,id=c,path=/a,server=maybe") == "Parameter 'server' expects 'on' or 'off'")
        #expect(error("socket,id=1c,path=/a")
            == "Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter.")
    }
}
