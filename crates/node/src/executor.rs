//! Runs commands in a Python worker process.
