"""``python -m casalimpia.synthetic``: write synthetic rooms (see :func:`casalimpia.synthetic.files.main`)."""

from casalimpia.synthetic.files import main

main()
