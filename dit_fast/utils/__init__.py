"""Services shared by the layers above: ``validation`` (input checks and the errors the CLI prints), ``files``
(atomic writes), ``distributed`` (processes, collectives, stop signals) and ``hardware`` (GPU datasheet peaks)."""
