"""Compiled kernels that zoo builds on first use (see `zoo.kernels.cpu`)."""
