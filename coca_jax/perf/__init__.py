"""Performance tooling: analytic FLOPs, a roofline cost model over compiled HLO, compile targets
for accelerators this host lacks, and profile-trace summaries. Nothing in training depends on it."""
