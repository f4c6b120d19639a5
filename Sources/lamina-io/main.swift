#if canImport(Glibc)
import Glibc
#endif
import ImgTool

let status = await LaminaIO.main(CommandLine.arguments)
exit(status)
