"""The HTTP edge: routes that parse input, make one service call, and map the result to a response."""
