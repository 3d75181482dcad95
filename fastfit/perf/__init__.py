"""Measuring speed: timing helpers and roofline ceilings, results JSON with the environment, the throughput
profiler of a training step, and the fused-kernel microbenchmarks. Builds on the engine; the engine never imports it."""
