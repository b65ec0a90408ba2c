"""K-quants: 256-weight super-blocks (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)."""
