from kbdaemon.cli import main

raise SystemExit(main())
