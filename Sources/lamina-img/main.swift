import ImgTool
