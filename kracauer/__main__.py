from kracauer.cli import main

raise SystemExit(main())
