import Testing

@Test func placeholderNBDTests() {}
