"""Legacy 32-weight block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q6_0, IQ4_NL)."""
