"""How devices are reached (local processes, adb phones), deployed to and measured."""
