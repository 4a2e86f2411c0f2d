import os
import sys

from shoestring import dist
from shoestring.cli import main

code = main()
if dist.launched():
    # A torchrun worker ends here without the interpreter's teardown: gloo's threads outlive
    # destroy_process_group while modules still hold the group, and freeing them as the
    # interpreter finalizes can abort the process ("terminate called without an active
    # exception", exit -6) after the run succeeded, which torchrun then reports as a failed rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
