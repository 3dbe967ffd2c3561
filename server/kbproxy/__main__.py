from kbproxy.cli import main

raise SystemExit(main())
