"""The ``dit-fast`` commands, one module per command: its flags (``add_arguments``) and its ``main(args)``.

``dit_fast.cli`` picks the module, parses the flags and turns the exceptions ``main`` raises into messages and exit
statuses; the modules here hold no policy of their own for errors.
"""
