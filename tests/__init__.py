"""lowalign's test suite. A package, so pytest names its modules tests.<path> and never registers a test folder
under a top-level name (tests/kernels as `kernels` hid the package index's `kernels`, which transformers imports)."""
