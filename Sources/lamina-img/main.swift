#if canImport(Glibc)
import Glibc
#endif
import ImgTool

let status = await LaminaImg.main(CommandLine.arguments)
exit(status)
