"""Tools for a checkout, not installed with the package: local Flink and Spark clusters
(`make flink-up`, `make spark-up`), the Beam worker pool they run, the engines' Java, the
demo script and the system packages the tests need."""
