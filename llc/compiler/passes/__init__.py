"""The compiler passes, one file each; llc.compiler.PASSES is their registry."""
