"""Optimizers of our own (``conf/optimizer/<name>.yaml`` -> ``mtl_experiments/optimizer/<name>.py``); the other
options of ``conf/optimizer/`` point at ``torch.optim`` directly."""
