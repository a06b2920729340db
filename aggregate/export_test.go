package aggregate

// ParseEventTimeForTest exposes parseEventTime to the external tests.
var ParseEventTimeForTest = parseEventTime
