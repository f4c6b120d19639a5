import Testing

@Test func placeholderQMPTests() {}
