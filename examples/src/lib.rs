//! Example services, load generation and benchmarks for rootscale.
