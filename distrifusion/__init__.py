"""Multi-GPU runtime (DistriFusion-style patch parallelism) for the Wan model. Import submodules directly."""
