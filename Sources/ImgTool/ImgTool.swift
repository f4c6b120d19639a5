public enum ImgTool {}
