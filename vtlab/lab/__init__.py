"""The lab layer: what a learner touches in the notebooks (widgets, the ring lab, the toy
binary translator, the workload guests and the command line)."""
