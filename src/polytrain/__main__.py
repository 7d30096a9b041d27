from polytrain.cli import main

raise SystemExit(main())
