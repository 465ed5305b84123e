"""Load benchmarks and the mock upstream they (and the tests) point the gateway at."""
