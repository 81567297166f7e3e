"""The benchmark harness: prompt suites (`datasets`), quality metrics (`metrics`) and, built on the
decoding engine, the methods, reports and plots."""
