from shoestring import dist
from shoestring.cli import main

dist.exit_process(main())
