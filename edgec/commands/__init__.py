"""One module per ``edgec`` sub-command; each defines ``command`` (a click command).

The module name is the command name (underscores become dashes).  Keep imports of heavy
libraries (torch, tvm, onnxruntime) inside the command function so ``edgec --help`` is fast.
"""
