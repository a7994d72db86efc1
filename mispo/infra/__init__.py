"""The processes a job runs on: the Ray cluster and free ports (`cluster`), GPU placement groups per role
(`placement`), a CPU run's cores between engines and learners (`cpu_split`), quiet runs' log file (`run_log`),
DeepSpeed's accelerator choice (`accelerator`) and time limits on remote calls (`call_timeout`). Nothing here
knows about RL."""
