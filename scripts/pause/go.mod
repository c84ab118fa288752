// Stand-in for the Kubernetes pause container (the pod sandbox's init
// process), built static for real nodes in `sinabro lab`. Standard library
// only.
module sinabro.dev/scripts/pause

go 1.24.0
