"""Scripts launched as separate processes by the strategy tests (2 CPU ranks, gloo), plus what they share."""
