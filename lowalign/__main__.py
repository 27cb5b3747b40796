from lowalign.cli import main

raise SystemExit(main())
