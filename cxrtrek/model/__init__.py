"""CXRTrekNet: the network (config + modeling, the transformers way), its tokenizer and
processor, loading and saving, training and vision pretraining, and the bundled demo checkpoint.

No HTTP and nothing from the floors above: serving it is :mod:`cxrtrek.serve`'s job, and
:mod:`cxrtrek.backends.inprocess` puts it behind the VLM contract. torch loads with the modules
that use it, not with this package.
"""
