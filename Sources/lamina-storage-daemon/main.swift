print("lamina-storage-daemon: not yet")
