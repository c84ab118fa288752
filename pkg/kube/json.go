package kube

import "encoding/json"

// mustJSON encodes API request bodies; the types involved always encode.
func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}
